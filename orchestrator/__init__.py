"""Fulcrum's control plane: the authoritative state (membership, health,
policy) in a store, and the routing state derived from it."""
