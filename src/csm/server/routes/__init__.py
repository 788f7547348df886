"""The server's routes by area, one APIRouter each; `create_app` includes them in this order:

status.py     GET /health, /v1/stats, /v1/models
voices.py     GET and POST /v1/voices
speech.py     POST /v1/audio/speech
dialogue.py   POST /v1/audio/dialogue
metrics.py    GET /metrics (Prometheus)
session.py    WebSocket /v1/audio/session (a realtime session for voice agents)
(the web page at / is csm/server/web.py)
"""
