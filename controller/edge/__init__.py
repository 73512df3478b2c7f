"""The SIP edge: the decision channel to Kamailio and its management endpoint."""
