"""Helpers the tests share: imported by test modules and fixtures, never tests themselves."""
