"""The local HTTP API (`tsad-agent serve`): `service` computes, `server` speaks HTTP,
`prometheus` renders metrics, `openapi` describes the endpoints."""
