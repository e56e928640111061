from django.db import transaction
from django.shortcuts import get_object_or_404, redirect, render

from .models import Report
from .tasks import build_report


def index(request):
    """A form; POST enqueues the report's task and goes to the page that follows it."""
    if request.method == "POST":
        size = max(1, min(int(request.POST.get("size") or 10), 200))
        with transaction.atomic():
            report = Report.objects.create(size=size)
            # enqueue_on_commit: the worker gets it once the report row is committed.
            result = build_report.enqueue(report.pk, size)
            report.result_id = result.id
            report.save(update_fields=["result_id"])
        return redirect("follow", result_id=result.id)
    return render(request, "reports/index.html", {"reports": Report.objects.order_by("-pk")[:10]})


def follow(request, result_id):
    report = get_object_or_404(Report, result_id=result_id)
    return render(request, "reports/follow.html", {"report": report})
