"""Run the real components (Kamailio, SIPp, Redis) as local processes on free loopback ports."""
