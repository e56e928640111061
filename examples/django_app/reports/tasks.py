try:
    from django.tasks import task  # Django >= 6
except ImportError:
    from django_tasks import task  # Django 5.2 with django-tasks

from offload import progress

from .models import Report


@task
def build_report(report_id, size):
    """Add up the squares of 1..size, reporting progress as it goes."""
    report = Report.objects.get(pk=report_id)
    total = 0
    for i in range(1, size + 1):
        total += i * i
        # offload's progress(): the page follows it live (PROGRESS events).
        progress(i, size, message=f"step {i} of {size}")
    report.total = total
    report.save(update_fields=["total"])
    return {"report": report.pk, "total": total}
