"""The HTTP side: Starlette app, Strawberry GraphQL schema, authentication."""
