"""The local HTTP API (`tsad-agent serve`): `service` computes, `bodies` checks request
bodies, `server` speaks HTTP, `pool` and `transport` bound what connections can cost,
`prometheus` renders metrics, `openapi` describes the endpoints."""
