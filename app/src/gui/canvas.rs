//! The painting canvas: an image with a one-channel layer painted over it (the inpainting mask,
//! and the strokes drawn over a ControlNet map). One widget (its geometry, strokes, history,
//! view and toolbar, ~600 lines, then its tests), kept whole: both pages share all of it.
//! Brush and eraser with a round hard tip, strokes undoable
//! one by one, zoom about the cursor (wheel), pan (space + drag or the middle button), and the
//! brush outline drawn wherever the pointer is, also past the image's edges.
//!
//! Coordinates: image pixels are `[0, width) × [0, height)`, pixel `(x, y)` covering
//! `[x, x+1) × [y, y+1)`; on screen the image's top-left is `viewport.min + pan` and one pixel is
//! `zoom` points. A brush dab at `p` paints every pixel whose centre lies within `radius` of `p`,
//! and a stroke paints every pixel whose centre lies within `radius` of one of its segments.

use eframe::egui::{self, Color32, Key, Modifiers, Pos2, Rect, Sense, Stroke, Vec2, pos2, vec2};

/// The most strokes kept for undo.
pub const MAX_UNDO: usize = 200;
/// The brush radius range, in image pixels.
pub const BRUSH_RADIUS_RANGE: std::ops::RangeInclusive<f32> = 0.5..=512.0;
/// The zoom range.
pub const ZOOM_RANGE: std::ops::RangeInclusive<f32> = 0.05..=32.0;
/// The value painted pixels get.
pub const PAINTED: u8 = 255;
/// The value an eraser that covers (rather than unpaints) writes; see [`PaintCanvas::eraser_value`].
pub const ERASED: u8 = 1;

/// What the pointer does on the canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tool {
    /// Paints the layer (white = repaint for a mask).
    #[default]
    Brush,
    /// Erases it.
    Eraser,
}

/// One undoable change: a rectangle's pixels before and after.
#[derive(Debug, Clone)]
struct Edit {
    x0: usize,
    y0: usize,
    w: usize,
    before: Vec<u8>,
    after: Vec<u8>,
}

/// A stroke being drawn.
#[derive(Debug, Clone)]
struct ActiveStroke {
    /// The layer when the stroke began.
    before: Vec<u8>,
    /// The last point, in image pixels.
    last: Pos2,
    /// The pixels touched so far: `[x0, y0, x1, y1)`.
    dirty: Option<[usize; 4]>,
}

/// The canvas state: the layer, its history, the tool and the view.
pub struct PaintCanvas {
    width: usize,
    height: usize,
    layer: Vec<u8>,
    undo: Vec<Edit>,
    redo: Vec<Edit>,
    stroke: Option<ActiveStroke>,
    pub tool: Tool,
    /// Brush radius in image pixels.
    pub brush_radius: f32,
    /// Screen points per image pixel.
    pub zoom: f32,
    /// Where the image's top-left sits, relative to the viewport's top-left (points).
    pub pan: Vec2,
    /// Fit the image to the viewport on the next frame.
    pub fit_pending: bool,
    /// The viewport on screen in the last frame.
    pub viewport: Rect,
    /// Bumped on every change of the layer.
    revision: u64,
    overlay: Option<(u64, egui::TextureHandle)>,
    /// Colour of painted pixels over the image.
    pub overlay_color: Color32,
    /// What the eraser writes: 0 (unpainted) for a mask; a ControlNet map marks erased pixels
    /// with [`ERASED`] so they hide the map under them.
    pub eraser_value: u8,
    /// Colour of pixels holding any value other than 0 and [`PAINTED`] (erased ones).
    pub erased_color: Color32,
}

impl std::fmt::Debug for PaintCanvas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaintCanvas")
            .field("size", &(self.width, self.height))
            .field("undo", &self.undo.len())
            .field("redo", &self.redo.len())
            .field("tool", &self.tool)
            .field("brush_radius", &self.brush_radius)
            .field("zoom", &self.zoom)
            .finish_non_exhaustive()
    }
}

/// What a page calls its canvas' tools (the inpaint mask is brushed, the control map penned).
pub struct ToolLabels {
    pub brush: &'static str,
    pub brush_hint: Option<&'static str>,
    pub eraser_hint: Option<&'static str>,
    pub size: &'static str,
    pub clear: &'static str,
    pub clear_hint: Option<&'static str>,
}

impl PaintCanvas {
    /// An empty layer of `width × height` pixels.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            layer: vec![0; width * height],
            undo: Vec::new(),
            redo: Vec::new(),
            stroke: None,
            tool: Tool::Brush,
            brush_radius: 16.0,
            zoom: 1.0,
            pan: Vec2::ZERO,
            fit_pending: true,
            viewport: Rect::NOTHING,
            revision: 0,
            overlay: None,
            overlay_color: Color32::from_rgba_unmultiplied(255, 48, 48, 150),
            eraser_value: 0,
            erased_color: Color32::TRANSPARENT,
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// The layer, row-major, 0 = unpainted, [`PAINTED`] = painted.
    pub fn layer(&self) -> &[u8] {
        &self.layer
    }

    /// Whether nothing is painted.
    pub fn is_empty(&self) -> bool {
        self.layer.iter().all(|&v| v == 0)
    }

    /// How many pixels are painted.
    pub fn painted_pixels(&self) -> usize {
        self.layer.iter().filter(|&&v| v != 0).count()
    }

    /// The toolbar both canvases share, in a row the caller opens: brush and eraser, the size,
    /// undo and redo, clear, then `extra` (the page's own tools), then "Fit view" and the zoom.
    pub fn tools_ui(
        &mut self,
        ui: &mut egui::Ui,
        labels: &ToolLabels,
        extra: impl FnOnce(&mut Self, &mut egui::Ui),
    ) {
        let hint = |response: egui::Response, hint: Option<&str>| match hint {
            Some(text) => response.on_hover_text(text),
            None => response,
        };
        hint(
            ui.selectable_value(&mut self.tool, Tool::Brush, labels.brush),
            labels.brush_hint,
        );
        hint(
            ui.selectable_value(&mut self.tool, Tool::Eraser, "Eraser"),
            labels.eraser_hint,
        );
        self.size_and_history_ui(ui, labels.size);
        if hint(ui.button(labels.clear), labels.clear_hint).clicked() {
            self.clear();
        }
        extra(self, ui);
        ui.separator();
        if ui
            .button("Fit view")
            .on_hover_text("Wheel zooms; space + drag or the middle button pans.")
            .clicked()
        {
            self.fit();
        }
        ui.label(format!("{:.0}%", self.zoom * 100.0));
    }

    /// What every canvas toolbar has: the brush-size slider (labelled `size_label`; `[` and `]`
    /// change it too), then Undo and Redo.
    pub fn size_and_history_ui(&mut self, ui: &mut egui::Ui, size_label: &str) {
        let label = ui.label(size_label);
        ui.add(
            egui::Slider::new(&mut self.brush_radius, BRUSH_RADIUS_RANGE)
                .logarithmic(true)
                .suffix(" px"),
        )
        .labelled_by(label.id)
        .on_hover_text("Radius in image pixels; [ and ] change it.");
        ui.separator();
        if ui
            .add_enabled(self.can_undo(), egui::Button::new("Undo"))
            .on_hover_text("Ctrl+Z")
            .clicked()
        {
            self.undo();
        }
        if ui
            .add_enabled(self.can_redo(), egui::Button::new("Redo"))
            .on_hover_text("Ctrl+Shift+Z")
            .clicked()
        {
            self.redo();
        }
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Replaces the whole layer (a loaded mask) as one undoable change.
    pub fn replace_layer(&mut self, layer: Vec<u8>) -> Result<(), String> {
        if layer.len() != self.layer.len() {
            return Err(format!(
                "{} pixels given for a {}×{} layer",
                layer.len(),
                self.width,
                self.height
            ));
        }
        self.record_full(layer);
        Ok(())
    }

    /// Drops the undo and redo history (a restored layer is where the history starts).
    pub fn forget_history(&mut self) {
        self.undo.clear();
        self.redo.clear();
    }

    /// Erases everything (undoable).
    pub fn clear(&mut self) {
        self.record_full(vec![0; self.layer.len()]);
    }

    /// Swaps painted and unpainted (undoable).
    pub fn invert(&mut self) {
        let inverted = self
            .layer
            .iter()
            .map(|&v| if v == 0 { PAINTED } else { 0 })
            .collect();
        self.record_full(inverted);
    }

    fn record_full(&mut self, after: Vec<u8>) {
        self.finish_stroke();
        if after == self.layer {
            return;
        }
        let before = std::mem::replace(&mut self.layer, after.clone());
        self.push_edit(Edit {
            x0: 0,
            y0: 0,
            w: self.width,
            before,
            after,
        });
    }

    fn push_edit(&mut self, edit: Edit) {
        self.undo.push(edit);
        if self.undo.len() > MAX_UNDO {
            self.undo.remove(0);
        }
        self.redo.clear();
        self.revision += 1;
    }

    fn apply(&mut self, edit: &Edit, before: bool) {
        let pixels = if before { &edit.before } else { &edit.after };
        for (row, chunk) in pixels.chunks(edit.w).enumerate() {
            let start = (edit.y0 + row) * self.width + edit.x0;
            self.layer[start..start + edit.w].copy_from_slice(chunk);
        }
        self.revision += 1;
    }

    /// Undoes the last change; false when there is none.
    pub fn undo(&mut self) -> bool {
        self.finish_stroke();
        let Some(edit) = self.undo.pop() else {
            return false;
        };
        self.apply(&edit, true);
        self.redo.push(edit);
        true
    }

    /// Redoes the last undone change; false when there is none.
    pub fn redo(&mut self) -> bool {
        self.finish_stroke();
        let Some(edit) = self.redo.pop() else {
            return false;
        };
        self.apply(&edit, false);
        self.undo.push(edit);
        true
    }

    /// Starts a stroke with a dab at `p` (image pixels).
    pub fn begin_stroke(&mut self, p: Pos2) {
        self.finish_stroke();
        self.stroke = Some(ActiveStroke {
            before: self.layer.clone(),
            last: p,
            dirty: None,
        });
        self.paint_segment(p, p);
    }

    /// Continues the stroke to `p`.
    pub fn continue_stroke(&mut self, p: Pos2) {
        let Some(last) = self.stroke.as_ref().map(|s| s.last) else {
            self.begin_stroke(p);
            return;
        };
        if last != p {
            self.paint_segment(last, p);
        }
        if let Some(s) = self.stroke.as_mut() {
            s.last = p;
        }
    }

    /// Ends the stroke: what it changed becomes one undo step.
    pub fn finish_stroke(&mut self) {
        let Some(stroke) = self.stroke.take() else {
            return;
        };
        let Some([x0, y0, x1, y1]) = stroke.dirty else {
            return;
        };
        let w = x1 - x0;
        let mut before = Vec::with_capacity(w * (y1 - y0));
        let mut after = Vec::with_capacity(w * (y1 - y0));
        for y in y0..y1 {
            let row = y * self.width;
            before.extend_from_slice(&stroke.before[row + x0..row + x1]);
            after.extend_from_slice(&self.layer[row + x0..row + x1]);
        }
        if before != after {
            self.push_edit(Edit {
                x0,
                y0,
                w,
                before,
                after,
            });
        }
    }

    /// Whether a stroke is being drawn.
    pub fn stroke_active(&self) -> bool {
        self.stroke.is_some()
    }

    /// Paints (or erases) every pixel whose centre is within the brush radius of segment `a–b`.
    fn paint_segment(&mut self, a: Pos2, b: Pos2) {
        let r = self.brush_radius;
        let value = match self.tool {
            Tool::Brush => PAINTED,
            Tool::Eraser => self.eraser_value,
        };
        let lo = |v: f32| (v - r - 1.0).floor().max(0.0) as usize;
        let hi = |v: f32, n: usize| ((v + r + 1.0).ceil().max(0.0) as usize).min(n);
        let (x0, x1) = (lo(a.x.min(b.x)), hi(a.x.max(b.x), self.width));
        let (y0, y1) = (lo(a.y.min(b.y)), hi(a.y.max(b.y), self.height));
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        let ab = b - a;
        let len2 = ab.length_sq();
        let mut touched = false;
        for y in y0..y1 {
            for x in x0..x1 {
                let c = pos2(x as f32 + 0.5, y as f32 + 0.5);
                let t = if len2 > 0.0 {
                    ((c - a).dot(ab) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                if (a + ab * t - c).length_sq() <= r * r {
                    self.layer[y * self.width + x] = value;
                    touched = true;
                }
            }
        }
        if touched {
            self.revision += 1;
            if let Some(s) = self.stroke.as_mut() {
                s.dirty = Some(match s.dirty {
                    Some([a0, b0, a1, b1]) => [a0.min(x0), b0.min(y0), a1.max(x1), b1.max(y1)],
                    None => [x0, y0, x1, y1],
                });
            }
        }
    }

    /// Screen point → image pixel coordinates (with the last frame's viewport).
    pub fn screen_to_image(&self, p: Pos2) -> Pos2 {
        ((p - self.viewport.min - self.pan) / self.zoom).to_pos2()
    }

    /// Image pixel coordinates → screen point.
    pub fn image_to_screen(&self, p: Pos2) -> Pos2 {
        self.viewport.min + self.pan + p.to_vec2() * self.zoom
    }

    /// Zooms by `factor` keeping the image point under `screen` where it is.
    pub fn zoom_at(&mut self, screen: Pos2, factor: f32) {
        let anchor = self.screen_to_image(screen);
        self.zoom = (self.zoom * factor).clamp(*ZOOM_RANGE.start(), *ZOOM_RANGE.end());
        self.pan = screen - self.viewport.min - anchor.to_vec2() * self.zoom;
    }

    /// Fits the whole image in the viewport, centred.
    pub fn fit(&mut self) {
        let room = self.viewport.size();
        if room.x <= 0.0 || room.y <= 0.0 || self.width == 0 || self.height == 0 {
            return;
        }
        let size = vec2(self.width as f32, self.height as f32);
        self.zoom = (room.x / size.x)
            .min(room.y / size.y)
            .clamp(*ZOOM_RANGE.start(), *ZOOM_RANGE.end());
        self.pan = (room - size * self.zoom) / 2.0;
        self.fit_pending = false;
    }

    /// Grows (`+1`) or shrinks (`-1`) the brush by a quarter, at least one pixel.
    pub fn step_brush(&mut self, direction: i32) {
        let r = self.brush_radius;
        let step = (r * 0.25).max(1.0);
        let next = if direction > 0 { r + step } else { r - step };
        self.brush_radius = next.clamp(*BRUSH_RADIUS_RANGE.start(), *BRUSH_RADIUS_RANGE.end());
    }

    /// The canvas widget: `image` under the layer, filling the space left in `ui`.
    pub fn ui(&mut self, ui: &mut egui::Ui, image: &egui::TextureHandle) -> egui::Response {
        let (viewport, response) =
            ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
        self.viewport = viewport;
        if self.fit_pending {
            self.fit();
        }
        self.handle_keys(ui);
        self.handle_pointer(ui, &response);

        let painter = ui.painter_at(viewport);
        painter.rect_filled(viewport, 0.0, ui.visuals().extreme_bg_color);
        let image_rect = Rect::from_min_size(
            self.image_to_screen(Pos2::ZERO),
            vec2(self.width as f32, self.height as f32) * self.zoom,
        );
        let uv = Rect::from_min_max(Pos2::ZERO, pos2(1.0, 1.0));
        painter.image(image.id(), image_rect, uv, Color32::WHITE);
        let overlay = self.overlay_texture(ui.ctx());
        painter.image(overlay.id(), image_rect, uv, Color32::WHITE);
        painter.rect_stroke(
            image_rect,
            0.0,
            Stroke::new(1.0, ui.visuals().weak_text_color()),
            egui::StrokeKind::Outside,
        );
        // The brush outline, clipped to the viewport only: it stays visible at the image's edges.
        if let Some(p) = response
            .hover_pos()
            .or_else(|| self.stroke.as_ref().map(|s| self.image_to_screen(s.last)))
        {
            let r = self.brush_radius * self.zoom;
            painter.circle_stroke(p, r, Stroke::new(2.5, Color32::BLACK));
            painter.circle_stroke(p, r, Stroke::new(1.2, Color32::WHITE));
        }
        response
    }

    /// `[` `]` resize the brush; Ctrl+Z undoes, Ctrl+Shift+Z (or Ctrl+Y) redoes. Not while a
    /// text field has the keyboard (it has its own undo).
    fn handle_keys(&mut self, ui: &egui::Ui) {
        if ui.ctx().text_edit_focused() {
            return;
        }
        let (bigger, smaller, redo, undo) = ui.input_mut(|i| {
            let redo = i.consume_key(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z)
                || i.consume_key(Modifiers::COMMAND, Key::Y);
            (
                i.consume_key(Modifiers::NONE, Key::CloseBracket),
                i.consume_key(Modifiers::NONE, Key::OpenBracket),
                redo,
                i.consume_key(Modifiers::COMMAND, Key::Z),
            )
        });
        if bigger {
            self.step_brush(1);
        }
        if smaller {
            self.step_brush(-1);
        }
        if redo {
            self.redo();
        }
        if undo {
            self.undo();
        }
    }

    fn handle_pointer(&mut self, ui: &egui::Ui, response: &egui::Response) {
        let (pos, primary_down, middle_down, space, wheel, pinch, delta) = ui.input(|i| {
            let mut wheel = 0.0;
            for event in &i.events {
                if let egui::Event::MouseWheel { unit, delta, .. } = event {
                    wheel += match unit {
                        egui::MouseWheelUnit::Point => delta.y,
                        egui::MouseWheelUnit::Line => delta.y * 50.0,
                        egui::MouseWheelUnit::Page => delta.y * i.viewport_rect().height(),
                    };
                }
            }
            (
                i.pointer.latest_pos(),
                i.pointer.primary_down(),
                i.pointer.middle_down(),
                i.key_down(Key::Space),
                wheel,
                i.zoom_delta(),
                i.pointer.delta(),
            )
        });
        if let Some(p) = pos.filter(|_| response.hovered()) {
            let factor = (wheel * 0.002).exp() * pinch;
            if factor != 1.0 {
                self.zoom_at(p, factor);
            }
        }
        let down_here = response.is_pointer_button_down_on();
        if down_here && (middle_down || (space && primary_down)) {
            self.finish_stroke();
            self.pan += delta;
            return;
        }
        match (down_here && primary_down, pos) {
            (true, Some(p)) => {
                let p = self.screen_to_image(p);
                if self.stroke.is_some() {
                    self.continue_stroke(p);
                } else {
                    self.begin_stroke(p);
                }
            }
            _ => self.finish_stroke(),
        }
    }

    /// The layer as a texture (re-uploaded when it changed).
    fn overlay_texture(&mut self, ctx: &egui::Context) -> egui::TextureHandle {
        if let Some((rev, tex)) = &self.overlay
            && *rev == self.revision
        {
            return tex.clone();
        }
        let painted = self.overlay_color.to_srgba_unmultiplied();
        let erased = self.erased_color.to_srgba_unmultiplied();
        let mut rgba = Vec::with_capacity(self.layer.len() * 4);
        for &v in &self.layer {
            rgba.extend_from_slice(match v {
                0 => &[0; 4],
                PAINTED => &painted,
                _ => &erased,
            });
        }
        let image = egui::ColorImage::from_rgba_unmultiplied([self.width, self.height], &rgba);
        let tex = match self.overlay.take() {
            Some((_, mut tex)) => {
                tex.set(image, egui::TextureOptions::NEAREST);
                tex
            }
            None => ctx.load_texture("canvas-layer", image, egui::TextureOptions::NEAREST),
        };
        self.overlay = Some((self.revision, tex.clone()));
        tex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dab_paints_the_pixels_within_the_radius() {
        let mut c = PaintCanvas::new(10, 10);
        c.brush_radius = 1.6;
        c.begin_stroke(pos2(5.0, 5.0));
        c.finish_stroke();
        // centres within 1.6 of (5, 5): the 4 around the point (0.71 away) and the 8 next to
        // them (1.58 away); the diagonal ones (2.12) stay clear
        assert_eq!(c.painted_pixels(), 12);
        assert!(c.can_undo());
        assert!(c.undo());
        assert!(c.is_empty());
        assert!(c.redo());
        assert_eq!(c.painted_pixels(), 12);
    }

    #[test]
    fn eraser_clear_and_invert_are_undoable() {
        let mut c = PaintCanvas::new(6, 4);
        c.brush_radius = 0.6;
        c.begin_stroke(pos2(0.5, 0.5));
        c.continue_stroke(pos2(5.5, 0.5));
        c.finish_stroke();
        assert_eq!(c.painted_pixels(), 6, "one row");
        c.tool = Tool::Eraser;
        c.begin_stroke(pos2(2.5, 0.5));
        c.finish_stroke();
        assert_eq!(c.painted_pixels(), 5);
        c.invert();
        assert_eq!(c.painted_pixels(), 24 - 5);
        c.clear();
        assert!(c.is_empty());
        for expected in [24 - 5, 5, 6, 0] {
            assert!(c.undo());
            assert_eq!(c.painted_pixels(), expected);
        }
        assert!(!c.undo());
    }

    #[test]
    fn brush_size_steps_stay_in_range() {
        let mut c = PaintCanvas::new(1, 1);
        c.brush_radius = 1.0;
        c.step_brush(-1);
        assert_eq!(c.brush_radius, *BRUSH_RADIUS_RANGE.start());
        c.brush_radius = 8.0;
        c.step_brush(1);
        assert_eq!(c.brush_radius, 10.0);
    }

    #[test]
    fn zoom_keeps_the_point_under_the_cursor() {
        let mut c = PaintCanvas::new(100, 100);
        c.viewport = Rect::from_min_size(pos2(10.0, 20.0), vec2(400.0, 300.0));
        let cursor = pos2(123.0, 77.0);
        let before = c.screen_to_image(cursor);
        c.zoom_at(cursor, 2.5);
        assert!((c.screen_to_image(cursor) - before).length() < 1e-4);
        assert_eq!(c.zoom, 2.5);
    }
}
