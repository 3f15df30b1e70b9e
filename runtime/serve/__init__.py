"""HTTP serving: the OpenAI Images API and AUTOMATIC1111's /sdapi/v1 over one batching worker per model.

    python -m runtime serve --model PATH [--backend B] [--host 127.0.0.1] [--port 7860] [--api-key KEY]

app.py builds the FastAPI app from {name: Pipeline} and ServeSettings (settings.py); requests are
validated into GenerationRequests (requests.py), queued and grouped into batches (batching.py), and
measured (metrics.py). ray_app.py wraps the same app in a Ray Serve deployment. Importing this package
imports neither torch nor fastapi.
"""
