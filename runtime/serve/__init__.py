"""HTTP serving: the OpenAI Images API and AUTOMATIC1111's /sdapi/v1 over one batching worker per model.

    python -m runtime serve --model PATH [--backend B] [--host 127.0.0.1] [--port 7860] [--api-key KEY]

app.py builds the FastAPI app from {name: Pipeline} and ServeSettings (settings.py). Each API
(openai_api.py, a1111_api.py) checks its fields (fields.py, http_input.py) into GenerationParams
(params.py); service.py queues them on the model's Batcher (batching.py), which groups equal batch keys
into one Pipeline.generate_batch call; metrics.py counts it all. ray_app.py wraps the same app in a
Ray Serve deployment. Importing this package imports neither torch nor fastapi.
"""
