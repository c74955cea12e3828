"""tokensmith: keeps OAuth2 access tokens fresh for services, from credentials in Vault or AWS."""

__version__ = "0.1.0"
