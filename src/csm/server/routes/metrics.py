"""GET /metrics: the Prometheus text exposition of `csm.server.metrics` (the API key guards it unless the server
runs with --metrics-public)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..schemas import errors

router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}, **errors(401)},
)
async def metrics(request: Request):
    """The server's metrics in Prometheus' text format."""
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
