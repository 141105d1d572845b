"""The OpenAI-compatible HTTP server over every budget of one checkpoint.

- protocol.py: request and response schemas (pydantic), the one error object shape;
- text.py: prompts to tokens, tokens to text as they come (stop strings, streaming),
  token strings of log-probs, chat templates;
- scheduler.py: one thread owning the decode loop over one copy of the weights, a
  `DecodeState` of slots per budget, requests admitted between steps (continuous batching),
  budget control moving a request from its think budget to its answer budget;
- metrics.py: Prometheus metrics;
- app.py: the FastAPI application and uvicorn around it (tools/serve.py is the command line).

It sits above inference/: nothing else in the package imports it (tests/test_layout.py).
"""
