"""The OpenAI-compatible HTTP server over every budget of one checkpoint.

- protocol.py: request and response schemas (pydantic), the one error object shape;
- text.py: prompts to tokens, tokens to text as they come (stop strings, streaming),
  token strings of log-probs, chat templates;
- scheduler.py: one thread owning the decode loop over one copy of the weights, a
  `DecodeState` of slots per budget, requests admitted between steps (continuous batching),
  budget control moving a request from its think budget to its answer budget;
- metrics.py: Prometheus metrics;
- app.py: the FastAPI application and uvicorn around it (tools/serve.py is the command line).
- upstream.py: budgets served by upstream OpenAI-compatible servers (vLLM, SGLang,
  llama.cpp, another tools/serve.py), run as the scheduler runs local ones: the same
  sequences and events; budget control across them with the trace as token ids;
- frontend.py: the front end: routes each request to the scheduler or the upstreams by
  budget; fleet.py: the upstreams' options and YAML file.

It sits above inference/: nothing else in the package imports it (tests/test_layout.py).
"""
