import argparse

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from llm.keys import api_key_create


def _name_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of at least 1 (leave it out for no limit)"
        )
    return number


class Command(BaseCommand):
    help = (
        "Create a gateway API key and print it. The key is shown only this once: "
        "the gateway stores its hash."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Who or what uses the key.")
        parser.add_argument(
            "--owner", help="Username of the person responsible for the key."
        )
        parser.add_argument(
            "--models",
            type=_name_list,
            default=[],
            help="Comma-separated models the key may call (default: all).",
        )
        parser.add_argument(
            "--prompts",
            type=_name_list,
            default=[],
            help="Comma-separated registry prompts the key may use (default: all).",
        )
        parser.add_argument(
            "--rpm",
            type=_positive_int,
            help="Maximum requests per minute (default: unlimited).",
        )
        parser.add_argument(
            "--tpm",
            type=_positive_int,
            help="Maximum tokens per minute (default: unlimited).",
        )
        parser.add_argument(
            "--tokens-per-day",
            type=_positive_int,
            help="Maximum tokens per UTC day (default: unlimited).",
        )

    def handle(self, *args, **options):
        owner = None
        if options["owner"]:
            owner = self._find_owner(options["owner"])
        try:
            key, raw_key = api_key_create(
                name=options["name"],
                owner=owner,
                allowed_models=options["models"],
                allowed_prompts=options["prompts"],
                requests_per_minute=options["rpm"],
                tokens_per_minute=options["tpm"],
                tokens_per_day=options["tokens_per_day"],
            )
        except ValidationError as error:
            problems = "; ".join(
                f"{field}: {' '.join(messages)}"
                for field, messages in error.message_dict.items()
            )
            raise CommandError(f"The key was not created. {problems}") from None

        self.stderr.write(
            f"Created API key {key.prefix}… ({key.name}). Copy it now; it is not "
            "shown again:"
        )
        self.stdout.write(raw_key)

    def _find_owner(self, username: str):
        user_model = get_user_model()
        try:
            return user_model.objects.get_by_natural_key(username)
        except user_model.DoesNotExist:
            raise CommandError(
                f"No user named {username!r}: create it first or leave out --owner."
            ) from None
