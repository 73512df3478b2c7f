"""The Asterisk side: ARI client, the Stasis application (media plane), audio health."""
