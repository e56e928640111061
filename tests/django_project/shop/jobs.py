"""offload's own API beside Django's Tasks framework: an exposed task, a plain function."""

from offload.django import get_offload

from .models import Note

off = get_offload()


@off.task(expose=True)
def double(x):
    return 2 * x


def count_notes_plain():
    return Note.objects.count()
