"""Helpers shared by the test tiers (no tests here): tiny models, oracles, live servers, processes."""
