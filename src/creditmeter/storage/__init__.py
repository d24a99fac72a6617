"""Storage: Redis hot state (changed only by Lua scripts), the config store, embedded Redis."""
