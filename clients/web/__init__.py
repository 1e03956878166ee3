"""The `imagesearch web` page: an ASGI app over the client library (app.py)
and one static page (static/). Needs the `[web]` extra (Starlette, uvicorn,
python-multipart); nothing here is imported by the rest of the client."""
