"""Who may reach a server without a key: the rule `nvfp4 serve` and `nvfp4 ui` share. A leaf module."""

from nvfp4.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_key(api_key: str | None, host: str, published_on: str | None) -> None:
    """An empty key is a mistake; no key is one too where other machines reach the server."""
    if api_key is not None and not api_key.strip():
        raise UserError("`api_key` is empty: set a real key, or leave it unset on a loopback host", field="api_key")
    reachable_on = published_on or host
    if api_key is None and reachable_on not in LOOPBACK:
        raise UserError(
            f"serving on {reachable_on} without a key lets any machine that reaches it use the models: "
            f"set `api_key`, or bind 127.0.0.1",
            field="api_key",
        )
