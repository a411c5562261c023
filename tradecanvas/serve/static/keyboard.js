// The chart's keys (docs/chart.md, Keyboard and accessibility), loaded before chart.js. With
// the chart focused (it is in the tab order), the legend reads a bar chosen from the keyboard
// as it reads the bar under the mouse or a finger:
//
//   ArrowLeft / ArrowRight   the previous / next point of the time scale (a bar, or a shaded
//                            hole's slot: the legend says there is no candle there)
//   PageUp / PageDown        a screenful back / forward (the bars in view)
//   Home                     the oldest point loaded
//   End, Escape              back to the newest bar, the view following the live bars again
//
// Moving left of the oldest point loaded loads the page before it, as dragging the chart back
// does, and goes on from there; the view scrolls to keep the chosen point in it (and scrolled
// near its oldest bar loads older ones, as a drag does).
"use strict";

window.tradecanvasKeyboard = (element, hooks) => {
  // hooks:
  //   points()    the time scale's points, ascending (the bars' times and the shaded holes')
  //   reading()   the point the legend reads, or null (the newest bar)
  //   read(time)  the legend and the crosshair on that point (chosen from the keyboard)
  //   newest()    back to the newest bar, the view scrolled to it
  //   loadOlder() a promise of the page before the oldest bar loaded (or of nothing more)
  //   timeScale() the chart's time scale (its visible logical range: the bars in view)

  // the index of `time` among `points`, or of the point before it (a time no longer there)
  function indexOf(points, time) {
    let lo = 0;
    let hi = points.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (points[mid] <= time) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  // the bars in view (at least one)
  function screenful() {
    const range = hooks.timeScale().getVisibleLogicalRange();
    return range ? Math.max(1, Math.floor(range.to - range.from)) : 1;
  }

  // the view moved (not zoomed) just enough that the point at `index` is in it
  function reveal(index) {
    const scale = hooks.timeScale();
    const range = scale.getVisibleLogicalRange();
    if (!range) return;
    let shift = 0;
    if (index < range.from + 1) shift = index - 1 - range.from;
    else if (index > range.to - 1) shift = index + 1 - range.to;
    if (shift !== 0) scale.setVisibleLogicalRange({ from: range.from + shift, to: range.to + shift });
  }

  function go(points, index) {
    const target = Math.max(0, Math.min(points.length - 1, index));
    hooks.read(points[target]);
    reveal(target);
  }

  // move by `delta` points (negative: back in time); past the oldest point loaded, the page
  // before it is loaded first (a promise: the next key waits for it)
  function move(delta) {
    const points = hooks.points();
    if (points.length === 0) return null;
    const current = hooks.reading();
    const at = current === null ? points.length - 1 : indexOf(points, current);
    if (at + delta >= 0 || at > 0) {
      go(points, at + delta);
      return null;
    }
    const oldest = points[0];
    return Promise.resolve(hooks.loadOlder()).then(() => {
      const more = hooks.points();
      if (more.length && more[0] < oldest) go(more, indexOf(more, oldest) + delta);
    });
  }

  function home() {
    const points = hooks.points();
    if (points.length) go(points, 0);
  }

  const KEYS = {
    ArrowLeft: () => move(-1),
    ArrowRight: () => move(1),
    PageUp: () => move(-screenful()),
    PageDown: () => move(screenful()),
    Home: home,
    End: () => hooks.newest(),
    Escape: () => hooks.newest(),
  };
  // the keys in the order pressed: one waiting for an older page delays those after it
  let queue = Promise.resolve();

  element.addEventListener("keydown", (event) => {
    const action = KEYS[event.key];
    if (!action || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault(); // the arrows, PageUp/PageDown, Home and End would scroll the page
    queue = queue.then(action).catch(() => {}); // (loadOlder says its own failures)
  });
};
