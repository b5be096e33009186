"""segd's HTTP kit: what the server API and the orchestrator API share.

- `routes`: route declarations (method, path, handler, who may call, body and
  answer types, query parameters) and the adapter that authenticates through
  the API's hook, reads and decodes the body and encodes the answer.
- `errors`: the one table of error codes, `{"error", "message"}` answers, the
  error middleware and the `Expect` handler.
- `body`: the body reader (segd-decoded encodings, the size limit after decoding).
- `params`: query-parameter helpers.
- `runner`: an application on segd's listener (`listener`, `connections`), with TLS.
- `openapi`: the OpenAPI document of a route table, from the msgspec types.
- `client`: the typed, synchronous admin client every segd client uses.
"""
