"""`segd ctl`: the admin client (a synchronous HTTP client, separate from the server)."""

from segd.ctl.main import ctl_main

__all__ = ["ctl_main"]
