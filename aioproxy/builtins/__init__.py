"""Built-in behaviour, registered as ordinary (trylast) plugins so that any plugin can replace it."""
