from django.conf import settings
from django.db import models


class ImmutableRowError(Exception):
    """Raised when code tries to update a row that may only be inserted."""


class Prompt(models.Model):
    """A named prompt whose versions come from files, one of them active."""

    name = models.CharField(max_length=100, unique=True)
    # The active version's description, copied on activation so lists need no join.
    description = models.TextField(blank=True)
    active_version = models.ForeignKey(
        "PromptVersion",
        on_delete=models.RESTRICT,
        null=True,
        blank=True,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class PromptVersion(models.Model):
    """One synced ``<name>/v<N>.yaml``. A synced version never changes."""

    prompt = models.ForeignKey(
        Prompt, on_delete=models.CASCADE, related_name="versions"
    )
    version = models.PositiveIntegerField()
    description = models.TextField(blank=True)
    template = models.TextField()
    # Empty when the file sets no system text or model (the default model applies).
    system = models.TextField(blank=True)
    model = models.CharField(max_length=100, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    variables = models.JSONField(default=dict, blank=True)
    content_hash = models.CharField(
        max_length=64, help_text="sha256 of the file's content as canonical JSON."
    )
    source_path = models.CharField(
        max_length=500, help_text="Path of the file below the prompts folder."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["prompt_id", "-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["prompt", "version"], name="unique_prompt_version"
            ),
            models.CheckConstraint(
                condition=models.Q(version__gte=1), name="prompt_version_at_least_1"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prompt.name} v{self.version}"

    def save(self, *args, **kwargs):
        # NOTE: QuerySet.update() bypasses this check. Only the admin (read-only)
        # and prompts_sync (inserts only) write versions.
        if not self._state.adding:
            raise ImmutableRowError(
                f"{self} is already synced and never changes: add a new version file "
                "instead."
            )
        super().save(*args, **kwargs)


class PromptActivation(models.Model):
    """One change of a prompt's active version: the history behind rollbacks."""

    class Source(models.TextChoices):
        SYNC = "sync", "sync_prompts"
        ADMIN = "admin", "admin"

    prompt = models.ForeignKey(
        Prompt, on_delete=models.CASCADE, related_name="activations"
    )
    version = models.ForeignKey(
        PromptVersion, on_delete=models.RESTRICT, related_name="+"
    )
    previous_version = models.ForeignKey(
        PromptVersion,
        on_delete=models.RESTRICT,
        null=True,
        blank=True,
        related_name="+",
    )
    # Null for sync_prompts, and when the user who made the change was deleted.
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    changed_at = models.DateTimeField(auto_now_add=True)
    source = models.CharField(max_length=10, choices=Source.choices)

    class Meta:
        ordering = ["-changed_at", "-id"]
        indexes = [
            models.Index(
                fields=["prompt", "-changed_at"], name="prompt_activation_history"
            )
        ]

    def __str__(self) -> str:
        return f"{self.prompt.name}: v{self.version.version}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ImmutableRowError("Activation history rows are never changed.")
        super().save(*args, **kwargs)
