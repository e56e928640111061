try:
    from django.tasks import task  # Django >= 6
except ImportError:
    from django_tasks import task  # the backport, Django 5.2

from .models import Note


@task
def add(x, y):
    return x + y


@task(takes_context=True)
def describe(context, tag):
    result = context.task_result
    return {"id": result.id, "attempt": context.attempt, "tag": tag, "status": str(result.status),
            "args": result.args}


@task
def write_note(text):
    note = Note.objects.create(text=text, written_by="task")
    return {"pk": note.pk, "count": Note.objects.count()}


@task
def count_notes():
    return Note.objects.count()


@task
def fail(message):
    raise ValueError(message)


@task(priority=50, queue_name="emails")
def send_mail(to):
    return f"sent to {to}"


def not_a_task(x):
    return x
