// The heatmap opacity sliders: each range input fades its coloured overlay over the grayscale picture beneath it.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("input[type=range][data-heat]").forEach(function (slider) {
    var heat = document.getElementById(slider.dataset.heat);
    if (!heat) return;
    var apply = function () { heat.style.opacity = String(slider.value / 100); };
    slider.addEventListener("input", apply);
    apply();
  });
});
