// Hand-drawn SVG charts: line charts of per-epoch metrics, 12-lead ECG plots, probability bars.

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#1f6feb", "#d92d20", "#079455", "#dc6803", "#7a5af8", "#0e9384", "#c11574", "#475467"];

function s(tag, attributes = {}, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

/** Round tick values covering [lo, hi]: about `count` of them at 1/2/5 × 10^k steps. */
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((m) => m >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

/**
 * A line chart: `series` = [{name, points: [[x, y], ...]}]; each point is drawn as a circle (class "point")
 * joined by a line. Returns an <svg class="chart">.
 */
export function lineChart({ title, series, xLabel = "epoch", yLabel = "", width = 420, height = 260 }) {
  const margin = { left: 58, right: 12, top: 26, bottom: 40 };
  const svg = s("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  svg.append(s("title", {}, title));
  svg.append(s("text", { x: margin.left, y: 16, "font-weight": "600" }, title));
  const points = series.flatMap((line) => line.points).filter(([, y]) => Number.isFinite(y));
  if (!points.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no values yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  const pad = (y1 - y0) * 0.05;
  [y0, y1] = [y0 - pad, y1 + pad];
  const w = width - margin.left - margin.right;
  const hgt = height - margin.top - margin.bottom;
  const X = (x) => margin.left + ((x - x0) / (x1 - x0)) * w;
  const Y = (y) => margin.top + (1 - (y - y0) / (y1 - y0)) * hgt;
  const axes = s("g", { stroke: "#98a2b3" });
  axes.append(s("line", { x1: margin.left, y1: margin.top + hgt, x2: margin.left + w, y2: margin.top + hgt }));
  axes.append(s("line", { x1: margin.left, y1: margin.top, x2: margin.left, y2: margin.top + hgt }));
  svg.append(axes);
  for (const t of ticks(y0, y1, 4)) {
    svg.append(s("line", { x1: margin.left, x2: margin.left + w, y1: Y(t), y2: Y(t), stroke: "#eaecf0" }));
    svg.append(s("text", { x: margin.left - 4, y: Y(t) + 4, "text-anchor": "end" }, +t.toPrecision(3)));
  }
  for (const t of ticks(x0, x1, 6).filter((t) => Number.isInteger(t) || xLabel !== "epoch")) {
    svg.append(s("text", { x: X(t), y: margin.top + hgt + 14, "text-anchor": "middle" }, t));
  }
  svg.append(s("text", { x: margin.left + w / 2, y: height - 6, "text-anchor": "middle" }, xLabel));
  if (yLabel) svg.append(s("text", { x: 12, y: margin.top + hgt / 2, transform: `rotate(-90 12 ${margin.top + hgt / 2})`, "text-anchor": "middle" }, yLabel));
  series.forEach((line, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const finite = line.points.filter(([, y]) => Number.isFinite(y));
    const group = s("g", { class: "series", "data-name": line.name });
    group.append(s("polyline", { fill: "none", stroke: colour, "stroke-width": 2, points: finite.map(([x, y]) => `${X(x)},${Y(y)}`).join(" ") }));
    for (const [x, y] of finite) {
      const dot = s("circle", { class: "point", cx: X(x), cy: Y(y), r: 3, fill: colour });
      dot.append(s("title", {}, `${line.name} ${xLabel} ${x}: ${y}`));
      group.append(dot);
    }
    svg.append(group);
    svg.append(s("rect", { x: margin.left + 8 + i * 110, y: margin.top - 4, width: 10, height: 3, fill: colour }));
    svg.append(s("text", { x: margin.left + 22 + i * 110, y: margin.top, "font-size": 10 }, line.name));
  });
  return svg;
}

/**
 * A 12-lead ECG plot: one lane per lead, labelled, on ECG paper's grid (0.2 s, 0.5 mV), seconds on the
 * x-axis and a mV scale on the y-axis. `signal` = {leads, fs, unit, samples: [[mV, ...] per lead]}.
 */
export function ecgPlot(signal, title, { width = 1100, lane = 70 } = {}) {
  const margin = { left: 64, right: 12, top: 26, bottom: 36 };
  const n = signal.samples.length;
  const length = Math.max(...signal.samples.map((row) => row.length));
  const seconds = length / signal.fs;
  const height = margin.top + margin.bottom + lane * n;
  const w = width - margin.left - margin.right;
  const svg = s("svg", { class: "ecg", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "data-leads": n });
  svg.append(s("title", {}, title));
  svg.append(s("text", { x: margin.left, y: 16, "font-weight": "600" }, title));
  // vertical scale: the largest lead's robust range fits a lane
  const spans = signal.samples.map((row) => {
    const sorted = [...row].filter(Number.isFinite).sort((a, b) => a - b);
    return sorted.length ? sorted[Math.floor(sorted.length * 0.995)] - sorted[Math.floor(sorted.length * 0.005)] : 1;
  });
  const mvPerLane = Math.max(1, Math.ceil(Math.max(...spans) * 2) / 2 + 0.5);
  const pxPerMv = lane / mvPerLane;
  const X = (t) => margin.left + (t / seconds) * w;
  const grid = s("g", { stroke: "#fbd5d5", "stroke-width": 0.6 });
  for (let t = 0; t <= seconds + 1e-9; t += 0.2) grid.append(s("line", { x1: X(t), x2: X(t), y1: margin.top, y2: margin.top + lane * n }));
  svg.append(grid);
  signal.samples.forEach((row, i) => {
    const mid = margin.top + lane * (i + 0.5);
    const sorted = [...row].filter(Number.isFinite).sort((a, b) => a - b);
    const median = sorted.length ? sorted[Math.floor(sorted.length / 2)] : 0;
    for (let mv = -Math.floor(mvPerLane / 2 / 0.5) * 0.5; mv <= mvPerLane / 2 + 1e-9; mv += 0.5) {
      svg.append(s("line", { x1: margin.left, x2: margin.left + w, y1: mid - mv * pxPerMv, y2: mid - mv * pxPerMv, stroke: "#fde8e8", "stroke-width": 0.6 }));
    }
    svg.append(s("text", { x: 6, y: mid + 4, "font-weight": "600", class: "lead-label" }, signal.leads[i]));
    // a 1 mV calibration bar with its label on the y-axis
    svg.append(s("line", { x1: margin.left - 8, x2: margin.left - 8, y1: mid + pxPerMv / 2, y2: mid - pxPerMv / 2, stroke: "#344054", "stroke-width": 2 }));
    svg.append(s("text", { x: margin.left - 12, y: mid - pxPerMv / 2 + 4, "text-anchor": "end", "font-size": 9 }, "1 mV"));
    const step = Math.max(1, Math.floor(row.length / 4000));
    const coordinates = [];
    for (let k = 0; k < row.length; k += step) {
      if (Number.isFinite(row[k])) coordinates.push(`${X(k / signal.fs).toFixed(1)},${(mid - (row[k] - median) * pxPerMv).toFixed(1)}`);
    }
    svg.append(s("polyline", { class: "trace", fill: "none", stroke: "#101828", "stroke-width": 1, points: coordinates.join(" ") }));
  });
  const axisY = margin.top + lane * n;
  svg.append(s("line", { x1: margin.left, x2: margin.left + w, y1: axisY, y2: axisY, stroke: "#98a2b3" }));
  for (const t of ticks(0, seconds, 10)) {
    svg.append(s("line", { x1: X(t), x2: X(t), y1: axisY, y2: axisY + 4, stroke: "#98a2b3" }));
    svg.append(s("text", { x: X(t), y: axisY + 16, "text-anchor": "middle" }, t));
  }
  svg.append(s("text", { x: margin.left + w / 2, y: height - 4, "text-anchor": "middle" },
    `time (s) · ${signal.fs} Hz · amplitude in ${signal.unit || "mV"} (grid 0.2 s × 0.5 mV)`));
  return svg;
}

/** Horizontal bars of per-class probabilities with each class's threshold marked. */
export function probabilityChart(classes, probabilities, thresholds, labels) {
  const width = 520, row = 26, left = 70;
  const height = row * classes.length + 30;
  const svg = s("svg", { class: "chart probabilities", width, height, viewBox: `0 0 ${width} ${height}` });
  const w = width - left - 110;
  classes.forEach((name, i) => {
    const y = 8 + i * row;
    const p = probabilities[name];
    const t = thresholds[name];
    const predicted = labels.includes(name);
    svg.append(s("text", { x: 4, y: y + 14, "font-weight": predicted ? "700" : "400" }, name));
    svg.append(s("rect", { x: left, y, width: w, height: 18, fill: "#eaecf0" }));
    svg.append(s("rect", { class: "probability-bar", x: left, y, width: w * p, height: 18, fill: predicted ? "#d92d20" : "#1f6feb", "data-class": name, "data-p": p }));
    if (t !== null && t !== undefined) {
      svg.append(s("line", { x1: left + w * t, x2: left + w * t, y1: y - 3, y2: y + 21, stroke: "#101828", "stroke-width": 2 }));
    }
    svg.append(s("text", { x: left + w + 6, y: y + 14 }, `${(p * 100).toFixed(1)}% ${t === null ? "(never)" : `/ ${(t * 100).toFixed(1)}%`}`));
  });
  svg.append(s("text", { x: left, y: height - 4, "font-size": 10 }, "bar: probability · black mark: the class's threshold · red: predicted"));
  return svg;
}
