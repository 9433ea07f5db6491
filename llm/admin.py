from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers

from llm.keys import api_key_assign_secret, api_key_revoke
from llm.models import ApiKey


class NameListField(forms.CharField):
    """A comma-separated text field for a JSON list of names."""

    def prepare_value(self, value):
        if isinstance(value, list):
            return ", ".join(value)
        return value

    def to_python(self, value) -> list[str]:
        text = super().to_python(value)
        names = [item.strip() for item in text.split(",") if item.strip()]
        return list(dict.fromkeys(names))


class ApiKeyForm(forms.ModelForm):
    allowed_models = NameListField(required=False)
    allowed_prompts = NameListField(
        required=False,
        help_text="Comma-separated prompt names; empty allows all prompts.",
    )

    class Meta:
        model = ApiKey
        fields = [
            "name",
            "owner",
            "allowed_models",
            "allowed_prompts",
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
            "revoked",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The served models come from settings, so the hint is built per form.
        self.fields["allowed_models"].help_text = (
            "Comma-separated model names; empty allows all. Served: "
            f"{', '.join(sorted(settings.LLM_MODELS))}."
        )


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = [
        "name",
        "prefix",
        "owner",
        "created_at",
        "last_used_at",
        "revoked",
        "requests_per_minute",
        "tokens_per_minute",
        "tokens_per_day",
    ]
    list_filter = ["revoked"]
    list_select_related = ["owner"]
    search_fields = ["name", "prefix"]
    actions = ["revoke_selected"]

    def get_readonly_fields(self, request, obj=None):
        fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
        # Revoking is final: a leaked key must not come back by a stray click.
        if obj is not None and obj.revoked:
            fields.append("revoked")
        return fields

    def get_fields(self, request, obj=None):
        fields = list(ApiKeyForm.Meta.fields)
        if obj is None:
            # A new key has no stamps yet and starts live.
            fields.remove("revoked")
            return fields
        return fields + ["prefix", "created_at", "last_used_at", "revoked_at"]

    def save_model(self, request, obj, form, change):
        if not change:
            # Kept on the request only until response_add renders it once.
            request.new_api_key = api_key_assign_secret(obj)
        elif "revoked" in form.changed_data and obj.revoked:
            obj.revoked_at = timezone.now()
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        # The key goes into this response's body only. A redirect would have to
        # carry it through the messages cookie or the session table.
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "API key created",
            "api_key": obj,
            "raw_key": request.new_api_key,
            "change_url": reverse("admin:llm_apikey_change", args=[obj.pk]),
            "changelist_url": reverse("admin:llm_apikey_changelist"),
        }
        response = TemplateResponse(
            request, "admin/llm/apikey/key_created.html", context
        )
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke_selected(self, request, queryset):
        live = list(queryset.filter(revoked=False))
        for key in live:
            api_key_revoke(key)
            self.log_change(request, key, "Revoked the key.")
        self.message_user(
            request,
            f"Revoked {len(live)} API key(s); they are rejected from the next "
            "request on.",
            messages.SUCCESS,
        )
