"""Adapters that register fastloss's losses with training frameworks (``fastloss.integrations.basicsr``)."""
