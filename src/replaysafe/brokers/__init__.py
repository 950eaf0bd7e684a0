"""Broker adapters. Each imports its driver lazily and names the extra to install."""
