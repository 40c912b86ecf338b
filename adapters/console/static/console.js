// Draws every <canvas data-chart="ID"> from the JSON in <script id="ID">: a stacked bar chart.
(function () {
  function draw() {
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      if (canvas.dataset.drawn) return;
      var source = document.getElementById(canvas.dataset.chart);
      if (!source || typeof Chart === "undefined") return;
      var data = JSON.parse(source.textContent);
      new Chart(canvas, {
        type: "bar",
        data: data,
        options: {
          animation: false,
          maintainAspectRatio: false,
          scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } },
        },
      });
      canvas.dataset.drawn = "1";
    });
  }
  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
})();
