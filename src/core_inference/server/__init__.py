"""``core-inference serve``: an OpenAI-compatible HTTP server for any loaded model (extra ``server``).

- ``protocol``: request bodies parsed and checked (standard library only);
- ``serving``: admission, choices, responses and server-sent events over the contract;
- ``metrics``: the Prometheus page;
- ``app``: the Starlette routes, the gate (auth, draining, counting) and the uvicorn runner.

Only ``app`` imports Starlette and uvicorn.
"""

INSTALL_HINT = "pip install 'core-inference[server]'"
