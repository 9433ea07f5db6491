import django.dispatch

# Sent after the transaction that changed a prompt's active version commits,
# with keyword arguments prompt_name: str, version: int,
# previous_version: int | None and changed_by: str | None (a username, or None
# for sync_prompts). The sender is the Prompt model.
prompt_activated = django.dispatch.Signal()
