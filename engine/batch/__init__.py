"""Batch offline rendering: jobs files, work items keyed on content, a ledger, local and Ray runners."""
