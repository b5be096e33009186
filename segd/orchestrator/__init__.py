"""The container orchestration server (patent ¶0023-0026).

`service` holds the rules, `store` the SQLite state, `docker` the Docker Engine
clients, `api` and `app` the REST API and its lifecycle.
"""
