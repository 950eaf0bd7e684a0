"""Conformance suites shipped with the package; each backend's tests subclass them."""
