"""Example apps (importable as MODULE:APP for `replaysafe explain` and `replaysafe run`)."""
