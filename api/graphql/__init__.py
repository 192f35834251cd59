"""api.graphql."""
