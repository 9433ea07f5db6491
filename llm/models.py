from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models


def validate_name_list(value) -> None:
    """Raise ValidationError unless the value is a list of non-empty strings."""
    if not isinstance(value, list) or not all(
        isinstance(item, str) and item.strip() for item in value
    ):
        raise ValidationError(
            'Enter a list of names, for example ["gemini-3.5-flash"], or an empty '
            "list to allow all."
        )


class ApiKey(models.Model):
    """A client's key to the gateway, with what it may use and how much.

    Only the SHA-256 hash of the key is stored. The full key is shown once, when
    the key is created, and cannot be recovered afterwards.
    """

    name = models.CharField(
        max_length=100, help_text="Who or what uses this key, e.g. billing-service."
    )
    # A user account rather than free text: the admin picks the person
    # responsible from a list, and a user who still owns keys cannot be deleted
    # until the keys are deleted or handed to someone else. Keys of a service
    # nobody owns leave it empty.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="api_keys",
        help_text="The person responsible for this key; empty for none.",
    )
    prefix = models.CharField(
        max_length=16,
        db_index=True,
        editable=False,
        help_text="The start of the key, kept to recognize it; not a secret.",
    )
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="Updated at most once a minute.",
    )
    revoked = models.BooleanField(
        default=False,
        help_text="A revoked key is rejected from the next request on. Revoking "
        "cannot be undone: create a new key instead.",
    )
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    allowed_models = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_name_list],
        help_text="Models this key may call; empty allows all served models.",
    )
    allowed_prompts = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_name_list],
        help_text="Registry prompts this key may render; empty allows all.",
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Empty means unlimited.",
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Prompt plus completion tokens; empty means unlimited.",
    )
    tokens_per_day = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Prompt plus completion tokens per UTC day; empty means unlimited.",
    )

    class Meta:
        verbose_name = "API key"
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def clean(self) -> None:
        # Catches a typo here rather than as a 403 on the key's first request.
        # A model that stops being served later stays in the list harmlessly.
        served = settings.LLM_MODELS
        models = self.allowed_models if isinstance(self.allowed_models, list) else []
        unknown = [
            model for model in models if isinstance(model, str) and model not in served
        ]
        if unknown:
            raise ValidationError(
                {
                    "allowed_models": (
                        f"Not served: {', '.join(unknown)}. Choose from "
                        f"{', '.join(sorted(served))}, or leave empty to allow all."
                    )
                }
            )
