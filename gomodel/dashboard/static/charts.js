// Charts: Chart.js (vendor/chart.umd.min.js, loaded by the page as window.Chart), nothing drawn by hand.

export const COLORS = {
  blue: "#1f6feb", green: "#1a7f37", red: "#cf222e", orange: "#bc4c00", purple: "#8250df", teal: "#0a7b83",
  gray: "#6e7781",
};

function library() {
  if (!window.Chart) throw new Error("The chart library did not load (vendor/chart.umd.min.js).");
  return window.Chart;
}

// A chart on a new canvas inside `box`: type "line" or "bar"; series [{label, color, data, type?, axis?}].
export function chart(box, {type = "line", labels = [], series = [], yTitle, stacked = false, horizontal = false,
  y2Title} = {}) {
  const Chart = library();
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", series.map((s) => s.label).join(", "));
  box.append(canvas);
  const scales = {
    x: {stacked, ticks: {maxRotation: 0, autoSkip: true, autoSkipPadding: 12}, grid: {display: false}},
    y: {stacked, beginAtZero: true, title: {display: Boolean(yTitle), text: yTitle || ""},
      ticks: {precision: 0}},
  };
  if (y2Title) {
    scales.y2 = {position: "right", beginAtZero: true, title: {display: true, text: y2Title},
      grid: {drawOnChartArea: false}};
  }
  if (horizontal) {
    [scales.x, scales.y] = [scales.y, scales.x];
    // long names (models) keep their end, the part that tells them apart, counted in characters (an emoji is two
    // UTF-16 units: never cut in half)
    scales.y.ticks = {callback(value) {
      const text = [...String(this.getLabelForValue(value))];
      return text.length > 28 ? `…${text.slice(-27).join("")}` : text.join("");
    }};
  }
  return new Chart(canvas, {
    type,
    data: {labels, datasets: series.map((s) => dataset(s, type))},
    options: {
      indexAxis: horizontal ? "y" : "x",
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      interaction: {mode: "index", intersect: false},
      plugins: {legend: {position: "bottom", labels: {boxWidth: 12}}},
      spanGaps: false, // (a bucket with nothing timed is null: the line stops there, see isolated())
      scales,
    },
  });
}

function dataset(s, type) {
  const line = (s.type || type) === "line";
  return {
    label: s.label, data: s.data || [], type: s.type, yAxisID: s.axis || "y",
    borderColor: s.color, backgroundColor: line ? `${s.color}22` : `${s.color}cc`,
    borderWidth: line ? 2 : 0, pointRadius: line ? isolated : undefined, pointHoverRadius: 4, tension: 0.25,
    maxBarThickness: 28,
    fill: Boolean(s.fill),
  };
}

// A line's point is drawn only where it has no neighbour to draw a line to (one busy minute).
function isolated(context) {
  const data = context.dataset.data;
  const i = context.dataIndex;
  const gap = (v) => v === null || v === undefined;
  return !gap(data[i]) && gap(data[i - 1]) && gap(data[i + 1]) ? 3 : 0;
}

// New labels and data for each series, drawn at once without animation.
export function update(target, labels, data) {
  target.data.labels = labels;
  data.forEach((values, index) => {
    target.data.datasets[index].data = values;
  });
  target.update("none");
}
