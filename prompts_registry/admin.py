"""Admin of the prompt registry.

Staff choose a prompt's active version here, and everything else is
read-only: versions come only from files through ``sync_prompts``, and the
activation history only from ``prompt_activate``.
"""

from django import forms
from django.contrib import admin
from django.db.models import Count, Max
from django.utils.html import format_html

from prompts_registry.models import Prompt, PromptActivation, PromptVersion
from prompts_registry.services import prompt_activate


def _can_view_prompts(request) -> bool:
    return request.user.has_perm("prompts_registry.view_prompt") or (
        request.user.has_perm("prompts_registry.change_prompt")
    )


def _preformatted(text: str):
    return format_html('<pre style="white-space: pre-wrap">{}</pre>', text)


@admin.display(boolean=True, description="Active")
def version_is_active(version: PromptVersion) -> bool:
    return version.prompt.active_version_id == version.pk


@admin.display(description="From")
def activation_from(activation: PromptActivation) -> str:
    previous = activation.previous_version
    return f"v{previous.version}" if previous else "-"


@admin.display(description="To")
def activation_to(activation: PromptActivation) -> str:
    return f"v{activation.version.version}"


class ReadOnlyAdminMixin:
    """Permissions of rows that are visible to whoever may view prompts.

    Nobody adds, changes or deletes them in the admin.
    """

    def has_view_permission(self, request, obj=None):
        return _can_view_prompts(request)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class PromptAdminForm(forms.ModelForm):
    class Meta:
        model = Prompt
        fields = ["active_version"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        field = self.fields.get("active_version")
        if field is None:
            # A user without change permission gets the field read-only.
            return
        # Only this prompt's own versions are valid choices. A posted id of
        # another prompt's version fails validation as an invalid choice.
        field.queryset = PromptVersion.objects.filter(
            prompt_id=self.instance.pk
        ).order_by("-version")
        field.required = True
        field.empty_label = None
        field.label_from_instance = _version_choice_label
        field.help_text = (
            "Saving applies the chosen version to the next request in every "
            "process. To roll back, choose the previous version again."
        )


def _version_choice_label(version: PromptVersion) -> str:
    summary = version.description.strip().splitlines()[0] if version.description else ""
    return f"v{version.version}: {summary}" if summary else f"v{version.version}"


class PromptVersionInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = PromptVersion
    fields = ("version", version_is_active, "model", "parameters", "variables", "texts")
    readonly_fields = fields
    ordering = ("-version",)
    extra = 0
    show_change_link = True

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("prompt")

    @admin.display(description="System and template")
    def texts(self, obj: PromptVersion):
        if not obj.system:
            return _preformatted(obj.template)
        return format_html(
            "<strong>System</strong>{}<strong>Template</strong>{}",
            _preformatted(obj.system),
            _preformatted(obj.template),
        )


class PromptActivationInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = PromptActivation
    fk_name = "prompt"
    fields = ("changed_at", activation_from, activation_to, "changed_by", "source")
    readonly_fields = fields
    extra = 0
    verbose_name = "activation"
    verbose_name_plural = "Activation history"

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("version", "previous_version", "changed_by")
        )


@admin.register(Prompt)
class PromptAdmin(admin.ModelAdmin):
    form = PromptAdminForm
    list_display = ("name", "active_version_number", "version_count", "last_change")
    search_fields = ("name", "description")
    fields = ("name", "description", "active_version", "updated_at")
    readonly_fields = ("name", "description", "updated_at")
    inlines = [PromptVersionInline, PromptActivationInline]

    def get_queryset(self, request):
        # Annotations keep the number of queries the same however many prompts
        # are listed. distinct=True because two joins multiply the rows.
        return (
            super()
            .get_queryset(request)
            .select_related("active_version")
            .annotate(
                version_count=Count("versions", distinct=True),
                last_change=Max("activations__changed_at"),
            )
        )

    @admin.display(description="Active version", ordering="active_version__version")
    def active_version_number(self, obj: Prompt) -> str:
        return f"v{obj.active_version.version}" if obj.active_version else "-"

    @admin.display(description="Versions", ordering="version_count")
    def version_count(self, obj: Prompt) -> int:
        return obj.version_count

    @admin.display(description="Last change", ordering="last_change")
    def last_change(self, obj: Prompt):
        return obj.last_change

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        # The active version is the only editable field. Going through the
        # service records the history row and sends prompt_activated, which a
        # plain obj.save() would skip.
        if "active_version" in form.changed_data:
            prompt_activate(
                prompt=obj,
                version=form.cleaned_data["active_version"],
                user=request.user,
                source=PromptActivation.Source.ADMIN,
            )


@admin.register(PromptVersion)
class PromptVersionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("__str__", version_is_active, "model", "created_at")
    list_filter = ("prompt",)
    list_select_related = ("prompt",)
    search_fields = ("prompt__name",)
    fields = (
        "prompt",
        "version",
        version_is_active,
        "description",
        "model",
        "parameters",
        "variables",
        "system_text",
        "template_text",
        "content_hash",
        "source_path",
        "created_at",
    )
    readonly_fields = fields

    @admin.display(description="System")
    def system_text(self, obj: PromptVersion):
        return _preformatted(obj.system) if obj.system else "-"

    @admin.display(description="Template")
    def template_text(self, obj: PromptVersion):
        return _preformatted(obj.template)


@admin.register(PromptActivation)
class PromptActivationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "prompt",
        activation_from,
        activation_to,
        "changed_by",
        "source",
        "changed_at",
    )
    list_filter = ("source", "prompt")
    list_select_related = ("prompt", "version", "previous_version", "changed_by")
    date_hierarchy = "changed_at"
