"""callfabric: programmable SIP for AI voice agents."""
