"""GET /health, /v1/stats and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..schemas import Health, ModelCard, ModelList, SchedulerStats, errors
from ..service import ServiceDep

router = APIRouter()


@router.get(
    "/health", response_model=Health, responses={503: {"model": Health, "description": "not serving"}}
)
async def health(service: ServiceDep):
    scheduler = service.scheduler
    status = "draining" if scheduler.draining else "ok" if scheduler.alive else "unavailable"
    body = {
        "status": status,
        "model": service.settings.model_name,
        "scheduler": scheduler.stats(),
        "sessions_open": service.sessions_open,  # realtime sessions (/v1/audio/session)
    }
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/v1/stats", response_model=SchedulerStats, responses=errors(401))
async def stats(service: ServiceDep):
    return service.scheduler.stats()


@router.get("/v1/models", response_model=ModelList, responses=errors(401))
async def models(service: ServiceDep):
    return ModelList(data=[ModelCard(id=service.settings.model_name)])
