"""``uvicorn tests.instrumentation.sample.zero_code_app:app``: the sample app with no pathwatch code."""

from tests.instrumentation.sample.app import build_app

app, manager = build_app()
