"""The public REST API (/v1), its auth, the call events stream and outgoing webhooks."""
