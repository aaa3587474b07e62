"""What a researcher's grid reports beyond a run's own pages: the reader study (:mod:`sim.reports.readers`,
``onfh report readers``) and the check that a page renders in headless Chromium
(:mod:`sim.reports.render_check`). A run's ``report.html`` and training curves are the ServerApp's
(:mod:`server.report_html`, :mod:`server.report_plots`), so a deployed coordinator writes them without ``sim``;
the grid's ``compare.html`` is rendered there too (``write_compare_html``).
"""
