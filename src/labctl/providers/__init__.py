"""Cloud adapters. Import `labctl.providers.base.provider_for` to get one; it imports its SDK lazily."""
