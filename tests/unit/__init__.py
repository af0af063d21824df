"""Unit tests: no servers, no exported model; fakes allowed."""
