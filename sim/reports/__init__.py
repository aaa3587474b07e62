"""What a run or a grid reports: ``report.html`` (:mod:`sim.reports.html`), the training curves
(:mod:`sim.reports.plots`), the reader study (:mod:`sim.reports.readers`, ``onfh report readers``) and the
check that a page renders in headless Chromium (:mod:`sim.reports.render_check`).
"""
