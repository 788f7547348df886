"""Clients for a `csm serve` server: `csm.client.session.SessionClient` (a realtime session over WebSocket)."""
